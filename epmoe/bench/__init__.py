"""GPU benchmarks behind `epmoe bench ...`: each module has configure_parser(parser) and main(args) -> int."""
