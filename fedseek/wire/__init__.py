"""What crosses the network, for both sides: adapter tensors <-> Flower records (`arrays`) and the
update codecs (`compression`). Imports no platform code; the coordinator and the sites share it."""
