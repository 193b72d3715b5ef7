# The image the torchx kubernetes example runs (docs/daily.md): lumrec's pinned stack in
# /lumrec/.venv, the repository (configs included) in /lumrec.
#
#   docker build -t REGISTRY/lumrec:TAG . && docker push REGISTRY/lumrec:TAG
#   docker run --rm REGISTRY/lumrec:TAG demo          # the entrypoint is the venv's `lumrec`
#
# scripts/setup_env.sh installs the CPU stack (torch CPU build, fbgemm-gpu-cpu). torchx's
# dist.ddp replaces the entrypoint with `torchrun ... -m lumrec.cli JOB CONFIG`, which the
# PATH below resolves to the venv.
FROM python:3.11-slim

WORKDIR /lumrec
COPY . .
RUN bash scripts/setup_env.sh && rm -rf /root/.cache/pip

ENV PATH=/lumrec/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["lumrec"]
CMD ["--help"]
