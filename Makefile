# The README's commands. Each target installs what it needs first (scripts/deps.sh: apt-get,
# through sudo when not root, only for missing packages) and says what it is doing; re-running
# is quick. The logic lives in scripts/ so that it also works without make.
#
#   make run      build (release) and run a node with conf/arknet.toml; ARGS="..." adds options
#   make test     everything CI tests: cargo test --locked with every real part it drives
#   make demo     two nodes on loopback and a real small model: the grid answering a chat
#   make doctor   what a node with conf/arknet.toml would find, and what is wrong
#   make release  target/release/arknet split into dist/arknet (small) + dist/arknet.debug
#   make install  install the release binary, config and systemd unit (scripts/install.sh, root)

ARGS ?=

.PHONY: run test demo doctor release install

run:
	@scripts/run.sh $(ARGS)

test:
	@scripts/test.sh $(ARGS)

demo:
	@scripts/demo.sh

doctor:
	@scripts/run.sh --doctor-only $(ARGS)

release:
	@scripts/release.sh

install:
	@scripts/install.sh
