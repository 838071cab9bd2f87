"""The web UI (`tunesmith ui`): see app.py."""
