"""What crosses the network, for both sides: adapter tensors <-> Flower records (`arrays`), the
update codecs (`compression`) and the reply schema (`replies`: the keys, types and checks of what
a ClientApp replies). Imports no platform, client or aggregator code; the coordinator and the sites
share it."""
