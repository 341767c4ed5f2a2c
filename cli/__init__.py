"""The `ditf` command line (installed as the `ditf_cli` package)."""
