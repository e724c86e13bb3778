# Shortcuts; each target runs a script that works without make too.
.PHONY: serve test lint model bench-quality bench-deepctr bench-fuxictr bench-memory bench-serve bench-redis bench-soak

serve:
	scripts/serve

test:
	scripts/test

lint:
	scripts/lint

# Rebuild the bundled default model (models/default), bit for bit.
model:
	scripts/bootstrap && .venv/bin/python -m model.default_model

bench-quality:
	scripts/bootstrap && .venv/bin/python -m benchmarks.train_quality

bench-deepctr:
	scripts/bootstrap && .venv/bin/pip install -q -e '.[bench]' && .venv/bin/python -m benchmarks.train_vs_deepctr

bench-fuxictr:
	scripts/bootstrap && .venv/bin/pip install -q -e '.[bench]' && .venv/bin/python -m benchmarks.train_vs_fuxictr

bench-memory:
	scripts/bootstrap && .venv/bin/python -m benchmarks.train_memory

# Needs wrk (apt-get install wrk).
bench-serve:
	scripts/bootstrap && .venv/bin/python -m benchmarks.serve

bench-redis:
	scripts/bootstrap && .venv/bin/python -m benchmarks.redis_tier

bench-soak:
	scripts/bootstrap && .venv/bin/python -m benchmarks.soak
