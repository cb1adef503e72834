"""Pure objectives: the GPO loss family, Bradley–Terry, calibration, and the shared preference diagnostics."""
