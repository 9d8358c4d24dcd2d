"""Errors a user fixes from the message alone (the CLI prints one line and exits 2), and finding one
inside Ray's wrappers: a worker's error reaches the driver as the `cause` of a RayTaskError, or in a
Ray Train WorkerGroupError's `worker_failures`."""

from __future__ import annotations


def user_error_kinds() -> tuple[type[BaseException], ...]:
    from panacea_platform.config_base import ConfigError  # DeepSpeedConfigError is one too
    from panacea_platform.data.errors import DataFileError, DataUnavailableError, NotEnoughDataError, PoolOverlapError
    from panacea_platform.team_server.errors import SecretFileError, TrackingServerError
    from panacea_platform.tracking import TrackingUnreachableError

    return (
        ConfigError,
        DataFileError,
        DataUnavailableError,
        NotEnoughDataError,
        PoolOverlapError,
        FileNotFoundError,
        TrackingServerError,
        SecretFileError,
        TrackingUnreachableError,
    )


def user_error_in(
    exc: BaseException, kinds: tuple[type[BaseException], ...] | None = None, follow_context: bool = False
) -> BaseException | None:
    """The first error of `kinds` (default: user_error_kinds()) in `exc` or what caused it, else None.

    `follow_context` also follows errors raised while another was handled (`__context__`): Ray Data's
    wrappers keep the user's error only there."""
    kinds = kinds or user_error_kinds()
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds) and not type(current).__module__.startswith("ray"):
            return current
        stack.extend(
            [
                current.__cause__,
                getattr(current, "cause", None),
                *getattr(current, "worker_failures", {}).values(),
                current.__context__ if follow_context else None,
            ]
        )
    return None
