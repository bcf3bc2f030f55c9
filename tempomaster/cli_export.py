"""`python -m tempomaster.cli_export` = `tm-export`."""
import sys

from .cli import export_main

sys.exit(export_main())
