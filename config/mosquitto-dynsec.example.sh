#!/bin/sh
# mosquitto dynamic-security set-up for doorbell-agent (example): the same rules as
# mosquitto-acl.example, plus the device account bound to the device's MQTT client id, so that
# the account's password alone cannot be used to connect as anything else, nor from a copied
# config with another client id. Use it instead of password_file/acl_file: see the "dynamic
# security" section of mosquitto.example.conf.
#
# What the binding does and does not do: mosquitto then refuses the device account unless it
# connects with exactly CLIENT_ID. It does not stop another account from connecting with that
# client id; what stops that is that nobody can guess it (the random suffix `doorbell-agent init`
# makes, shown by `doorbell-agent status`), so keep the broker's log private.
#
#   ADMIN_PASSWORD=... DEVICE_PASSWORD=... CLIENT_ID=doorbell-agent-front-door-0123... \
#     sh mosquitto-dynsec.example.sh
#   ADMIN_PASSWORD=... REQUESTER=city-police REQUESTER_PASSWORD=... \
#     sh mosquitto-dynsec.example.sh requester      (once per requester)
#
# Needs a running broker with the plugin loaded and an admin account made by
# `mosquitto_ctrl dynsec init /var/lib/mosquitto/dynamic-security.json admin`.
set -eu

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-1883}
ADMIN=${ADMIN:-admin}
PREFIX=${PREFIX:-doorbell}
DEVICE=${DEVICE:-front-door}

ctl() {
    mosquitto_ctrl -h "$HOST" -p "$PORT" -u "$ADMIN" -P "${ADMIN_PASSWORD:?admin password}" \
        dynsec "$@" >/dev/null
}

if [ "${1:-device}" = requester ]; then
    # One account and one role per requester R, naming R (mosquitto 2.0's dynamic security has
    # no %u): its own responses and deliveries, plus what every requester may do.
    r=${REQUESTER:?requester id R}
    ctl createRole "doorbell-requester-$r"
    ctl addRoleACL "doorbell-requester-$r" subscribePattern "$PREFIX/+/responses/$r" allow
    ctl addRoleACL "doorbell-requester-$r" subscribePattern "$PREFIX/+/deliveries/$r/#" allow
    ctl createClient "$r" -p "${REQUESTER_PASSWORD:?password}"
    ctl addClientRole "$r" doorbell-requester
    ctl addClientRole "$r" "doorbell-requester-$r"
    exit 0
fi

# Every requester: publish requests and receipts to any device; read every device's retained
# status and audit head. Nothing else (its own topics come with its own role, above).
ctl createRole doorbell-requester
ctl addRoleACL doorbell-requester publishClientSend "$PREFIX/+/requests" allow
ctl addRoleACL doorbell-requester publishClientSend "$PREFIX/+/receipts" allow
ctl addRoleACL doorbell-requester subscribePattern "$PREFIX/+/status" allow
ctl addRoleACL doorbell-requester subscribePattern "$PREFIX/+/audit/head" allow

# The device: reads its requests, receipts and (at start) its own retained audit head; writes
# its responses, deliveries, status and audit head. Bound to its client id (-c).
role="doorbell-device-$DEVICE"
ctl createRole "$role"
for topic in requests receipts audit/head; do
    ctl addRoleACL "$role" subscribePattern "$PREFIX/$DEVICE/$topic" allow
done
for topic in "responses/#" "deliveries/#" status audit/head; do
    ctl addRoleACL "$role" publishClientSend "$PREFIX/$DEVICE/$topic" allow
done
ctl createClient "doorbell-$DEVICE" -p "${DEVICE_PASSWORD:?device password}" \
    -c "${CLIENT_ID:?the device client id, from doorbell-agent status}"
ctl addClientRole "doorbell-$DEVICE" "$role"
