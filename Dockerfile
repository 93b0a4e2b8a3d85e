# Multi-stage build of the relay binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY relay relay
COPY sql sql
COPY tests tests
RUN cargo build --release --bin relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --home /nonexistent relay
COPY --from=build /src/target/release/relay /usr/local/bin/relay
COPY sql /usr/share/provisioning-relay/sql
USER relay
EXPOSE 9187
ENTRYPOINT ["relay"]
CMD ["run"]
