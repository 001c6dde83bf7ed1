"""NetworkManager's own keyfile reader (libnm, through GObject introspection), for the tests."""

from __future__ import annotations

import gi

gi.require_version("NM", "1.0")
from gi.repository import GLib, NM  # noqa: E402


def read(text: str) -> NM.Connection:
    """The connection NetworkManager makes of a keyfile in system-connections, or GLib.Error."""
    keyfile = GLib.KeyFile()
    keyfile.load_from_data(text, len(text.encode()), GLib.KeyFileFlags.NONE)
    return NM.keyfile_read(keyfile, "/etc/NetworkManager/system-connections", NM.KeyfileHandlerFlags.NONE, None, None)


def wifi(text: str) -> tuple[bytes, str, str]:
    """SSID bytes, PSK and interface name, as NetworkManager reads them."""
    connection = read(text)
    connection.verify()
    ssid = bytes(connection.get_setting_wireless().get_ssid().get_data())
    return ssid, connection.get_setting_wireless_security().get_psk(), connection.get_interface_name()
