"""``python -m PPCRegistrationWeb [--host H] [--port P] [--upload-limit-mb N]``: serve the browser app.

Defaults: ``HOST`` (127.0.0.1: this machine only), ``PORT`` (8080) and ``PPCREG_UPLOAD_LIMIT_MB`` (1024) from
the environment."""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m PPCRegistrationWeb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"),
                        help="address to bind (default $HOST or 127.0.0.1; 0.0.0.0 serves other machines too)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")),
                        help="port (default $PORT or 8080; 0 picks a free one)")
    parser.add_argument("--upload-limit-mb", type=float, default=None,
                        help="largest upload in MB (default $PPCREG_UPLOAD_LIMIT_MB or 1024)")
    args = parser.parse_args()
    import logging

    import torch

    # our own log lines (one per Run: updates, time) on stderr; trame's INFO chatter stays off
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[app] %(message)s"))
    log = logging.getLogger("PPCRegistrationWeb")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    torch.set_num_threads(int(os.environ.get("PPCREG_THREADS", "1")))
    from .app import serve

    serve(args.host, args.port, args.upload_limit_mb)


if __name__ == "__main__":
    main()
