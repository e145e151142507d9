"""Message builders: `cup` (terminal-side CUP POS requests), `iso87` (host-side ISO 8583:1987
requests), `response` (answers in either dialect). Builders return `Message`s whose field values are
already in the target dialect's pyiso8583 representation.

    from gateway.iso.build import cup, iso87, response, TerminalIdent
"""

from __future__ import annotations

from gateway.iso.build import cup, iso87
from gateway.iso.build.common import CardInput, TerminalIdent, security_control
from gateway.iso.build.iso87 import OriginalData
from gateway.iso.build.response import response

__all__ = ["CardInput", "OriginalData", "TerminalIdent", "cup", "iso87", "response", "security_control"]
