# The `drover` binary: every role, plus the operator CLI.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p drover --bin drover

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/drover /usr/local/bin/drover
COPY examples /examples
ENTRYPOINT ["drover"]
