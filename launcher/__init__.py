"""The command line and process management: sits on top of trainer and data_pipeline."""
