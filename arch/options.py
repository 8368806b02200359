"""Plugin options: ``model.residual.options`` / ``model.preconditioner.options`` checked by name.

A plugin declares ``option_defaults`` (every option it reads, with its default) and may declare
``option_choices`` (option -> allowed values) and ``check_options(options, key)`` for other
checks. ``resolve_options`` merges what the user gave over the defaults and raises a ConfigError
naming ``<key>.<option>`` for an option the plugin does not know or a value it cannot use. A
plugin without ``option_defaults`` (e.g. an out-of-tree plugin that declares none) gets the
options as given, unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arch.registry import ConfigError


def resolve_options(
    plugin: object, given: Mapping[str, Any] | None, key: str, name: str
) -> dict[str, Any]:
    """``plugin``'s options: its defaults updated with ``given``, checked; ``key`` names the dict."""
    given = dict(given or {})
    defaults = getattr(plugin, "option_defaults", None)
    if defaults is None:
        return given
    for option, value in given.items():
        if option not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(
                f"{key}.{option}", f"unknown option for {name!r} (its options: {known})"
            )
        choices = getattr(plugin, "option_choices", {}).get(option)
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{key}.{option}", f"must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
    options = {**defaults, **given}
    check = getattr(plugin, "check_options", None)
    if check is not None:
        check(options, key)
    return options
