"""What differs between Raspberry Pi OS releases, in one place.

The plan asks a Release, never a release name: where the boot partition is
mounted and which overlay variants (network stack) apply.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from builder.errors import BuildError, InputError


@dataclass(frozen=True)
class Release:
    codename: str
    boot_dir: str  # where the FAT boot partition is mounted in the running system
    network: str  # "dhcpcd" or "networkmanager": selects overlays/<role>/+<network>/
    reason: str  # why this release was chosen, for the plan and manifest

    @property
    def caveat(self) -> str:
        """What the user must know before flashing this release, or ''."""
        if self.codename in KNOWN:
            return ""
        return f"pibake does not know {self.codename}: it is baked as Trixie is, which may not suit it"

    @property
    def first_boot(self) -> str:
        """What configures the node on its first boot unless pibake has done it already."""
        return FIRST_BOOT[self.codename if self.codename in KNOWN else "trixie"]

    @property
    def cloud_init(self) -> bool:
        return self.first_boot.startswith("cloud-init")

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.network,)


# Every release pibake knows, oldest first: the one list that the CLI, the image
# catalog and the plans take release names from.
# Bullseye: dhcpcd and /boot. Bookworm changed both (NetworkManager, /boot/firmware);
# Trixie keeps Bookworm's layout.
KNOWN = {
    "bullseye": ("/boot", "dhcpcd"),
    "bookworm": ("/boot/firmware", "networkmanager"),
    "trixie": ("/boot/firmware", "networkmanager"),
}


# Bullseye and Bookworm boot once into raspberrypi-sys-mods' firstboot init (resize,
# disk id, host keys, custom.toml), which reboots; Trixie has none: its initramfs
# resizes and changes the disk id (` resize` on the kernel command line), with no
# reboot, and the node is handed to cloud-init, seeded from the boot partition.
FIRST_BOOT = {
    "bullseye": "raspberrypi-sys-mods firstboot (init= on the kernel command line)",
    "bookworm": "raspberrypi-sys-mods firstboot (init= on the kernel command line)",
    "trixie": "cloud-init (NoCloud seeds on the boot partition); pibake turns it off",
}


NAMES = tuple(KNOWN)


def parse_os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            parts = shlex.split(value) if value.strip() else [""]
            fields[key.strip()] = parts[0] if parts else ""
    return fields


def detect(os_release: str, is_raspberry_pi_os: bool, force: bool = False) -> Release:
    """Choose the release path from the image's own /etc/os-release.

    Raspberry Pi OS arm64 carries Debian's os-release, so the mark of Raspberry Pi
    OS is /etc/rpi-issue, which pi-gen writes into every image.
    """
    fields = parse_os_release(os_release)
    codename = fields.get("VERSION_CODENAME", "")
    pretty = fields.get("PRETTY_NAME", codename or "unknown system")
    if not is_raspberry_pi_os and not force:
        raise BuildError(f"the image is not Raspberry Pi OS ({pretty}; no /etc/rpi-issue); use --force to bake it anyway")
    if codename not in KNOWN:
        if not force:
            raise BuildError(
                f"unsupported release '{codename or pretty}' in the image's /etc/os-release "
                f"(pibake knows {', '.join(KNOWN)}); use --force to treat it as trixie"
            )
        boot_dir, network = KNOWN["trixie"]
        return Release(codename or "unknown", boot_dir, network, f"/etc/os-release: {pretty}; forced, treated as trixie")
    boot_dir, network = KNOWN[codename]
    return Release(codename, boot_dir, network, f"/etc/os-release: VERSION_CODENAME={codename} ({pretty})")


def named(codename: str) -> Release:
    """A release chosen by the user (`pibake plan --release`), without reading an image."""
    if codename not in KNOWN:
        raise InputError(f"unknown release '{codename}' (pibake knows {', '.join(KNOWN)})")
    boot_dir, network = KNOWN[codename]
    return Release(codename, boot_dir, network, f"--release {codename}")
