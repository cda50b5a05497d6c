# The `drover` binary: every role, plus the operator CLI.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p drover --bin drover

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 drover \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin drover \
    # The one place compose writes (its `secrets` volume takes this owner when first made).
    && mkdir /secrets && chown 10001:10001 /secrets
COPY --from=build /src/target/release/drover /usr/local/bin/drover
COPY examples /examples
# Runs as this non-root user (k8s: runAsUser 10001) and writes nothing to its root filesystem,
# so it runs with a read-only one (`readOnlyRootFilesystem: true`, `docker run --read-only`);
# /tmp is the only scratch space it may want.
USER 10001:10001
# The api, and the admin port (`--admin-listen`: /healthz, /readyz, /metrics).
EXPOSE 8080 9090
ENTRYPOINT ["drover"]
