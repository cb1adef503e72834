"""The sweep engine every algorithm shares: the member table, the data order, and the member program (layout, optimizer, divergence freeze, jit with shardings)."""
