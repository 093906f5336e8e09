# pairs.py SECONDS [INDEX ADDR PORT]...: connects to every ADDR:PORT at once, within SECONDS
# each, and prints one line per target: INDEX and ok, refused, timeout or "error WHY".
import socket, sys, threading
seconds = float(sys.argv[1])
targets = [sys.argv[i:i + 3] for i in range(2, len(sys.argv), 3)]
lock = threading.Lock()

def attempt(index, addr, port):
    try:
        socket.create_connection((addr, int(port)), seconds).close()
        result = "ok"
    except ConnectionRefusedError:
        result = "refused"
    except socket.timeout:
        result = "timeout"
    except OSError as e:
        result = "timeout" if "timed out" in str(e) else "error " + str(e)
    with lock:
        print(index, result, flush=True)

threads = [threading.Thread(target=attempt, args=t) for t in targets]
for t in threads:
    t.start()
for t in threads:
    t.join()
