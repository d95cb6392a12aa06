//! Log sources, sinks and shipping for keelson.
