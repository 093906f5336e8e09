# connect.py ADDR PORT SECONDS: connects to ADDR:PORT; prints ok, refused, timeout or error.
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
    print("ok")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("timeout" if "timed out" in str(e) else "error " + str(e))
