"""Reading (and, for fixtures, writing) Windows .etl trace files without any Windows API."""
