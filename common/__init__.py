"""What every fedpath room agrees on: manifest, feature files, bags, MIL models, wire format, metrics."""
