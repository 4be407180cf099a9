"""Example fusionkd plug-in package (see docs/engine.md, "Plug-ins")."""
