"""``ppcreg methods``: the registration methods by name, each with its model file and its schedule (the attempts
and stages its registration may run, docs/design.md §4.5)."""

from __future__ import annotations

from .cli_common import EXIT_OK, _say


def _cmd_methods(args) -> int:
    from .config import RegistrationConfig
    from .errors import ModelFileError
    from .methods import ALL_METHODS, METHOD_LABELS, default_model_path, learned_part, resolve_method

    base = RegistrationConfig()
    for name in ALL_METHODS:
        _say(f"{name}: {METHOD_LABELS[name]}")
        if learned_part(name) is not None:
            path = default_model_path(name, args.models_dir)
            try:
                method = resolve_method(name, models_dir=args.models_dir)
            except ModelFileError as exc:
                _say(f"  model file {path}: not usable ({exc})")
                continue
            _say(f"  model file {path}")
        else:
            method = resolve_method(name)
        for line in method.schedule(base).describe():
            _say(f"  {line}")
    return EXIT_OK


def add_parser(sub) -> None:
    """The ``methods`` subcommand."""
    p = sub.add_parser("methods", help="list the registration methods and what each runs",
                       description="List the methods that `ppcreg register` and `ppcreg evaluate` accept, with the "
                                   "model file of each learned one and the attempts and stages of its registration "
                                   "(default settings).")
    p.add_argument("--models-dir", metavar="DIR",
                   help="folder of the learned methods' model files (default Resources/Models)")
    p.set_defaults(func=_cmd_methods)
