"""The kelipsfs node: the sans-I/O protocol core (``daemon.core``) and its drivers."""
