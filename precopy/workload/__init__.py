"""The guest: pause, resume, throttle and device state, by signals, guest control or QEMU."""
