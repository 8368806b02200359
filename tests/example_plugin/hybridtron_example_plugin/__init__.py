"""An example out-of-tree hybridtron plugin package (see README, "Write a plugin")."""
