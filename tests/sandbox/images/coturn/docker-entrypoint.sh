#!/bin/sh
# Options (first argument starting with "-") go to turnserver, as upstream's do.
if [ "${1#-}" != "$1" ]; then
  set -- turnserver "$@"
fi
exec "$@"
