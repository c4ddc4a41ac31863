"""The command line: the only part of d2mae that knows about flags (:mod:`d2mae.commands.main`)."""
