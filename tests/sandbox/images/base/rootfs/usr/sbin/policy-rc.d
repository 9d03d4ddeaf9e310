#!/bin/sh
# Containers have no init system: tell maintainer scripts not to start services.
exit 101
