"""A stand-in for the daemon's display stream, in its own process as the daemon would be:
`python fake_publisher.py ENDPOINT RATE_HZ DURATION_S` binds a PUB socket and publishes a raw
(128 x 128 uint16) and a restored (256 x 256 float32) image per frame at RATE_HZ, each stamped
with the wall clock as its camera time; prints the send times (JSON) when done."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import zmq

from livedecon.daemon._protocol import Axes, Publication, Topic, encode_publication


def publish(endpoint: str, rate_hz: float, duration_s: float) -> list[float]:
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    rng = np.random.default_rng(0)
    images = (
        (Topic.RAW, rng.integers(100, 1000, (128, 128), dtype=np.uint16), 0.1),
        (Topic.RESTORED, rng.random((256, 256), dtype=np.float32), 0.05),
    )
    sent: list[float] = []
    time.sleep(0.3)  # the viewer's subscription arrives
    start = time.perf_counter()
    try:
        for i in range(int(rate_hz * duration_s)):
            delay = start + i / rate_hz - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            for topic, pixels, pixel_um in images:
                publication = Publication(
                    topic=topic,
                    acquisition_id="fast",
                    frame_id=i,
                    axes=Axes(time=i),
                    dtype=str(pixels.dtype),
                    shape=pixels.shape,
                    pixel_size_um=pixel_um,
                    timestamp_s=now,
                    published_s=now,
                    bundle_id="bench@1",
                    weights_version=1,
                    units="photoelectrons",
                )
                socket.send_multipart(encode_publication(publication, pixels))
            sent.append(now)
    finally:
        socket.close(linger=0)
    return sent


if __name__ == "__main__":
    print(json.dumps(publish(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))))
