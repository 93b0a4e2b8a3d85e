#!/usr/bin/env python3
# A before-stage script (JeraSoft's documented example): read the envelope on stdin, modify the
# data, print the modified JSON. The relay writes the changed fields back to the row.
#
#   relay handlers add prefix --stage before --event clients.create --script /opt/hooks/before_prefix.py
#
# Print the envelope unchanged (or nothing) to allow; print {"allow": false, "reason": "..."} to
# forbid (the change is undone).
import json
import sys

msg = json.load(sys.stdin)
name = msg["data"].get("name") or ""
if name.lower().startswith("test"):
    print(json.dumps({"allow": False, "reason": "test clients are not provisioned"}))
else:
    msg["data"]["name"] = name + "testprefix"
    print(json.dumps(msg))
