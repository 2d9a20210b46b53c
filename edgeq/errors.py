"""The exceptions edgeq raises for problems a user can fix.

Each message is one line that names the file, field or flag at fault and
says what to do. The CLI prints it as ``Error: <message>`` and exits 1,
without a traceback. Anything else that escapes is a bug in edgeq.
"""


class EdgeqError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1

    def __str__(self) -> str:
        # One line by contract: a newline or other control character can only
        # come from data quoted in the message (a file or archive entry name),
        # and is shown escaped so it cannot forge or split the line.
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DeviceError(EdgeqError):
    """devices.toml is wrong, or a device name is unknown."""


class ModelError(EdgeqError):
    """A model folder or file cannot be read or is not supported."""


class PlanError(EdgeqError):
    """No plan satisfies the request (memory, bits, shapes, quality)."""


class ArtifactError(EdgeqError):
    """An artifact is missing, tampered with, or cannot run on the device."""


class TargetError(EdgeqError):
    """A target cannot build or run what was asked."""


class FleetError(EdgeqError):
    """fleet.toml is wrong, or a rollout failed."""


class QualityGateError(EdgeqError):
    """The built artifact lost more quality than the gate allows."""
