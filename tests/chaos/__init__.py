"""The chaos suite: saga worker processes under kills, stalls, restarts and dropped
connections (``bash scripts/test.sh -m chaos -s``; full size: ``bash scripts/chaos.sh``)."""
