"""Running a config: validation in one place (``config``) and the train/eval/checkpoint loop (``loop``), above the algorithms."""
