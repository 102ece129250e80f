#!/bin/sh
# Submit a DDPO training run to the Ray cluster of docker-compose.yml, pointed at this deployment's Redis and reward
# servers. Arguments are those of `python -m services.train` (--config PRESET, --set key=value, --run-dir DIR, ...);
# they come after this script's own --set flags, so a --set given here wins.
#
#   docker compose exec ray-head deploy/submit.sh --config prompt_alignment      # on the head host
#   set -a && . ./.env && set +a && deploy/submit.sh --config aesthetic         # anywhere with ray==2.60.0 installed
#
# Reads: DDPO_REDIS_URL (without its password: the Ray nodes hand DDPO_REDIS_PASSWORD to the job's processes),
# DDPO_LLAVA_URLS, DDPO_BERTSCORE_URLS, DDPO_AESTHETIC_URLS (required, see .env.example),
# RAY_DASHBOARD_URL (default http://RAY_DASHBOARD_HOST:RAY_DASHBOARD_PORT), DDPO_SD_MODEL (optional: the diffusion
# model), RAY_JOB_SUBMIT_ARGS (optional extra `ray job submit` flags, e.g. "--no-wait --runtime-env
# deploy/runtime_env.yaml"). Exits with `ray job submit`'s status: non-zero when the job fails.
set -eu

missing="see .env.example"
address="${RAY_DASHBOARD_URL:-http://${RAY_DASHBOARD_HOST:-127.0.0.1}:${RAY_DASHBOARD_PORT:-8265}}"

# The job's command line is public to everyone who can list jobs (`ray job list`, the dashboard): no password there.
case "${DDPO_REDIS_URL:?$missing}" in
    *://*:*@* | *[?\&]password=*)
        echo "submit.sh: DDPO_REDIS_URL carries a password, which the job's command line would show;" \
            "leave it out: jobs take DDPO_REDIS_PASSWORD from the Ray nodes' environment" >&2
        exit 2
        ;;
esac

set -- \
    --set "cluster.redis_url=${DDPO_REDIS_URL:?$missing}" \
    --set "reward.servers.llava.urls=${DDPO_LLAVA_URLS:?$missing}" \
    --set "reward.servers.bertscore.urls=${DDPO_BERTSCORE_URLS:?$missing}" \
    --set "reward.servers.aesthetic.urls=${DDPO_AESTHETIC_URLS:?$missing}" \
    "$@"
if [ -n "${DDPO_SD_MODEL:-}" ]; then
    set -- --set "model.pretrained=${DDPO_SD_MODEL}" "$@"
fi

# RAY_JOB_SUBMIT_ARGS is a list of flags: split it on purpose.
# shellcheck disable=SC2086
exec ray job submit --address "$address" ${RAY_JOB_SUBMIT_ARGS:-} -- python -m services.train "$@"
