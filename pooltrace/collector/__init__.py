"""The collector behind ``pooltrace record``: an ETW system-logger session recording kernel pool events
with stacks, filtered by pool tag, plus a sidecar with driver PDB identities and the tag baseline.

Only :mod:`pooltrace.collector.winapi` talks to Windows (ctypes: advapi32, ntdll, psapi, kernel32). It is
imported lazily, on Windows only; every other module here is plain Python and runs (and is tested) on
any OS.
"""

NOT_WINDOWS = "recording needs Windows; analysis commands work here"
