"""Proxy reward models as frozen artifacts: a trained reward-model run exported as a proxy set, selectors (single proxies and ensembles), scoring."""
