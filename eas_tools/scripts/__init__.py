"""Stand-alone benchmark and load scripts: `python -m eas_tools.scripts.<name> --help`."""
