# listener.py PORT SECONDS: listens on PORT (0: one the kernel picks) for fleet check's port
# checks; prints "listening PORT" (or "in use ..."), accepts for SECONDS, and ends early when
# its stdin closes.
import select, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", port))
except OSError as e:
    print("in use", e, flush=True)
    sys.exit(0)
s.listen(64)
print("listening", s.getsockname()[1], flush=True)
end = time.time() + seconds
while time.time() < end:
    ready, _, _ = select.select([s, sys.stdin], [], [], max(0.0, end - time.time()))
    if sys.stdin in ready and not sys.stdin.buffer.read1(1):
        break
    if s in ready:
        c, _ = s.accept()
        c.close()
