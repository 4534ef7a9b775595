"""`dsv3-operator` / `python -m dsv3.operator`: run the Kopf handlers (settings: DSV3_OPERATOR_* env)."""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dsv3-operator", description=__doc__)
    p.add_argument(
        "--namespace",
        action="append",
        default=[ns for ns in os.environ.get("DSV3_OPERATOR_NAMESPACES", "").split(",") if ns],
        help="watch only these namespaces (repeatable; default: cluster-wide; env DSV3_OPERATOR_NAMESPACES)",
    )
    p.add_argument(
        "--liveness",
        default=os.environ.get("DSV3_OPERATOR_LIVENESS", ""),
        help="e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument("--log-level", default=os.environ.get("DSV3_OPERATOR_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import kopf

    import dsv3.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
