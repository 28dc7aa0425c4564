# Multi-stage build: compile in the Rust image, run on a slim Debian.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
COPY proto proto
RUN cargo build --release --locked --bin reaper

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/reaper /usr/local/bin/reaper
COPY config /etc/reaper
USER 65534:65534
ENTRYPOINT ["reaper"]
CMD ["run", "--config", "/etc/reaper/vpc-node.toml"]
