"""``python -m app.publish [--model-dir DIR]``: publish a checkpoint's rows to Redis
(``app.store.publisher``), from a deployment pipeline."""

from app.store.publisher import main

if __name__ == "__main__":
    raise SystemExit(main())
