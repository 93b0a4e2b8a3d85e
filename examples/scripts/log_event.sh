#!/bin/sh
# A script handler in shell: append each event to a log file.
#
#   relay handlers add audit-log --event 'clients.*' --script /opt/hooks/log_event.sh --arg /var/log/provisioning.log
#
# The envelope arrives on stdin. The environment holds only PATH, LANG and PROVISIONING_EVENT,
# PROVISIONING_DELIVERY_ID, PROVISIONING_ATTEMPT, PROVISIONING_HANDLER. Exit 0 = done; any other
# status = failed (retried on the handler's schedule); stderr lands in the execution log.
set -eu
log="${1:?usage: log_event.sh LOGFILE}"
payload=$(cat)
printf '%s %s attempt=%s id=%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROVISIONING_EVENT" \
    "$PROVISIONING_ATTEMPT" "$PROVISIONING_DELIVERY_ID" "$payload" >> "$log"
echo "logged"
