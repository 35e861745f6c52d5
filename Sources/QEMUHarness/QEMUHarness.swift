// QEMU harness: see the files beside this one.
