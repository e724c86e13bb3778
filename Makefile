# Shortcuts; each target runs a script that works without make too.
.PHONY: serve test test-engine lint model bench-quality bench-deepctr bench-fuxictr bench-memory bench-serve bench-serve-profile bench-workers-memory bench-big-calls bench-rank bench-redis bench-predlog bench-freshness-quality bench-updates bench-soak

serve:
	scripts/serve

test:
	scripts/test

# The image and docker-compose.yml on a Docker engine (skipped without one).
test-engine:
	scripts/test -m engine tests/deploy

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

bench-serve-profile:
	scripts/bootstrap && .venv/bin/pip install -q -e '.[profile]' && PATH=.venv/bin:$$PATH .venv/bin/python -m benchmarks.serve_profile

bench-workers-memory:
	scripts/bootstrap && .venv/bin/python -m benchmarks.workers_memory

bench-big-calls:
	scripts/bootstrap && .venv/bin/python -m benchmarks.big_calls

bench-rank:
	scripts/bootstrap && .venv/bin/python -m benchmarks.rank

bench-redis:
	scripts/bootstrap && .venv/bin/python -m benchmarks.redis_tier

bench-predlog:
	scripts/bootstrap && .venv/bin/python -m benchmarks.predlog

bench-freshness-quality:
	scripts/bootstrap && .venv/bin/python -m benchmarks.freshness_quality

bench-updates:
	scripts/bootstrap && .venv/bin/python -m benchmarks.updates

bench-soak:
	scripts/bootstrap && .venv/bin/python -m benchmarks.soak
