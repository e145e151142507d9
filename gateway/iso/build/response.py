"""The response to any request of either dialect: response MTI, the flow's echoed fields (specs/
flows.toml `response.echo`), 39, the caller's extra fields and, when the flow is MAC'd and the
response code calls for one, a MAC placeholder.

A request no flow matches still gets an answer (30 or 40) echoing the dialect's `default_echo`.
"""

from __future__ import annotations

from gateway.iso.build.common import add_mac_placeholder
from gateway.iso.errors import ValidationError
from gateway.iso.message import Message
from gateway.iso.mti import response_mti
from gateway.iso.validate import dialect_settings, identify


def _field_key(name: str) -> str:
    key = name.removeprefix("field_")
    if not key.isdigit() or not 2 <= int(key) <= 128 or key != str(int(key)):
        raise ValidationError("extra field names look like field_39", field=name)
    return key


def response(request: Message, rc: str, dialect: str, **extra_fields: str) -> Message:
    """Build the response to `request`. `extra_fields` are given as `field_37="..."` and override
    echoed values (e.g. field_60 with a host batch, field_48 with reconciled totals)."""
    try:
        mti = response_mti(request.mti)
    except ValueError:
        raise ValidationError("not a request MTI", field="t") from None
    if not isinstance(rc, str) or len(rc) != 2 or not rc.isascii() or not rc.isalnum():
        raise ValidationError("response code must be 2 letters or digits", field="39")
    settings = dialect_settings(dialect)
    flow = identify(dialect, request)
    echo = flow.response.echo if flow is not None else settings.default_echo
    source = request.fields
    fields = {k: source[k] for k in echo if k in source}
    fields["39"] = rc
    for name, value in extra_fields.items():
        if not isinstance(value, str):
            raise ValidationError("field values are strings", field=name)
        fields[_field_key(name)] = value
    if flow is not None and flow.mac and settings.response_has_mac(rc):
        add_mac_placeholder(fields, settings)
    else:
        for k in settings.mac_fields:
            fields.pop(k, None)
    return Message(mti, fields)
