#!/bin/sh
# Upstream's image has its interpreter at /usr/local/bin/python; ours is the venv's.
exec /opt/venv/bin/python "$@"
