"""napari's canvas rendered without any display server, for tests under QT_QPA_PLATFORM=offscreen.

Qt's offscreen platform provides OpenGL only through GLX, that is, with an X server; without
one, QOpenGLWidget (vispy's Qt canvas, hence napari's) has no context and napari fails as soon
as a layer is added. Mesa's EGL, however, renders with llvmpipe on its "surfaceless" platform
into pbuffers, with no display and no GPU. `install()` replaces vispy's Qt canvas backend by a
plain QWidget that draws the scene with such a context into a pbuffer of the widget's size and
paints the pixels it reads back (what vispy's own EGL canvas does on Linux, but with a pbuffer
instead of a window surface, which needs a display). napari is otherwise unchanged: its scene,
shaders and textures run on real OpenGL (Mesa 4.5 compatibility profile), so screenshots show
what a user would see. Call it before napari is imported (PyOpenGL picks EGL at import).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

EGL_PLATFORM_SURFACELESS_MESA = 0x31DD
EGL_OPENGL_API = 0x30A2
EGL_NONE = 0x3038
EGL_WIDTH, EGL_HEIGHT = 0x3057, 0x3056
CONFIG = (
    0x3024, 8,  # red
    0x3023, 8,  # green
    0x3022, 8,  # blue
    0x3021, 8,  # alpha
    0x3025, 24,  # depth
    0x3026, 8,  # stencil
    0x3033, 0x0001,  # surface type: pbuffer
    0x3040, 0x0008,  # renderable type: desktop OpenGL
    EGL_NONE,
)  # fmt: skip

draw_listeners: list[Callable[[], None]] = []  # called after each canvas draw (tests measure)
_egl: Any = None
_display: int | None = None
_config = ctypes.c_void_p()


def _attributes(*values: int) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


def available() -> str | None:
    """Why headless rendering cannot work here, or None when it can."""
    try:
        _initialise()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None


def _initialise() -> None:
    global _egl, _display
    if _egl is not None:
        return
    egl = ctypes.CDLL(ctypes.util.find_library("EGL") or "libEGL.so.1")
    egl.eglGetProcAddress.restype = ctypes.c_void_p
    egl.eglGetProcAddress.argtypes = [ctypes.c_char_p]
    address = egl.eglGetProcAddress(b"eglGetPlatformDisplayEXT")
    if not address:
        raise RuntimeError("EGL has no eglGetPlatformDisplayEXT")
    prototype = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p)
    display = prototype(address)(EGL_PLATFORM_SURFACELESS_MESA, None, None)
    egl.eglInitialize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    if not display or not egl.eglInitialize(display, None, None):
        raise RuntimeError("no EGL surfaceless display (Mesa's EGL is needed)")
    if not egl.eglBindAPI(EGL_OPENGL_API):
        raise RuntimeError("EGL cannot bind desktop OpenGL")
    count = ctypes.c_int()
    egl.eglChooseConfig.argtypes = [ctypes.c_void_p] * 5
    egl.eglChooseConfig(
        display, _attributes(*CONFIG), ctypes.byref(_config), 1, ctypes.byref(count)
    )
    if count.value < 1:
        raise RuntimeError("no EGL config for an OpenGL pbuffer")
    egl.eglCreateContext.restype = ctypes.c_void_p
    egl.eglCreateContext.argtypes = [ctypes.c_void_p] * 4
    egl.eglDestroyContext.argtypes = [ctypes.c_void_p] * 2
    egl.eglCreatePbufferSurface.restype = ctypes.c_void_p
    egl.eglCreatePbufferSurface.argtypes = [ctypes.c_void_p] * 3
    egl.eglDestroySurface.argtypes = [ctypes.c_void_p] * 2
    egl.eglMakeCurrent.argtypes = [ctypes.c_void_p] * 4
    _egl, _display = egl, display


def install() -> None:
    """Make every vispy (napari) Qt canvas created from now on render through EGL pbuffers."""
    os.environ["PYOPENGL_PLATFORM"] = "egl"  # PyOpenGL ('gl+', used by napari) on EGL
    _initialise()
    import napari._vispy  # noqa: F401  (selects vispy's Qt application)
    from qtpy import QtCore, QtGui
    from qtpy.QtWidgets import QWidget
    from vispy import app
    from vispy.app.backends._qt import QtBaseCanvasBackend

    class PbufferCanvasBackend(QtBaseCanvasBackend, QWidget):
        resized = QtCore.Signal()  # QOpenGLWidget's; napari connects to it

        def _init_specific(self, p: Any, kwargs: dict) -> None:
            p.context.shared.add_ref("qt-egl-pbuffer", self)
            shared = p.context.shared.ref
            self._owns_context = shared is self
            self._native_context = (
                _egl.eglCreateContext(_display, _config, None, None)
                if self._owns_context
                else shared._native_context
            )
            QWidget.__init__(self, p.parent, QtCore.Qt.WindowType.Widget)
            self._surface = None
            self._make_surface(*p.size)
            self._vispy_canvas.set_current()
            self._vispy_canvas.events.initialize()
            self._initialized = True

        def _make_surface(self, width: int, height: int) -> None:
            self._drop_surface()
            self._surface_size = (max(int(width), 1), max(int(height), 1))
            width, height = self._surface_size
            self._surface = _egl.eglCreatePbufferSurface(
                _display, _config, _attributes(EGL_WIDTH, width, EGL_HEIGHT, height, EGL_NONE)
            )

        def _drop_surface(self) -> None:
            if getattr(self, "_surface", None) is not None:
                _egl.eglMakeCurrent(_display, None, None, None)
                _egl.eglDestroySurface(_display, self._surface)
                self._surface = None

        def _vispy_set_current(self) -> None:
            if self._surface is not None:
                _egl.eglMakeCurrent(_display, self._surface, self._surface, self._native_context)

        def _vispy_swap_buffers(self) -> None:
            pass  # a pbuffer has one buffer; paintEvent reads it back

        def _vispy_close(self) -> None:
            self._drop_surface()
            if self._owns_context and self._native_context:
                _egl.eglDestroyContext(_display, self._native_context)
                self._native_context = None
            self.close()

        def resizeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
            width, height = event.size().width(), event.size().height()
            self._make_surface(width, height)
            self._physical_size = (width, height)
            self._vispy_canvas.set_current()
            self._vispy_canvas.events.resize(size=(width, height))
            self.resized.emit()

        def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
            if self._vispy_canvas is None or self._surface is None:
                return
            painter = QtGui.QPainter(self)
            painter.drawImage(QtCore.QRect(0, 0, self.width(), self.height()), self._render())
            painter.end()

        def grabFramebuffer(self) -> Any:  # noqa: N802 (QOpenGLWidget's, napari calls it)
            return self._render()

        def _render(self) -> Any:
            from OpenGL import GL

            self._vispy_canvas.set_current()
            self._vispy_canvas.events.draw(region=None)
            GL.glFinish()
            width, height = self._surface_size
            raw = GL.glReadPixels(0, 0, width, height, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE)
            rows = np.frombuffer(raw, np.uint8).reshape(height, width, 4)[::-1]
            pixels = np.ascontiguousarray(rows)
            for listener in draw_listeners:
                listener()
            image = QtGui.QImage(
                pixels.data, width, height, 4 * width, QtGui.QImage.Format.Format_RGBA8888
            )
            return image.copy()  # QImage does not own `pixels`

    app.use_app().backend_module.CanvasBackend = PbufferCanvasBackend
