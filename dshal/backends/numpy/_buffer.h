/* Buffer arguments of the numpy backend's C extensions (_backward.c, _decode.c). */
#ifndef DSHAL_BUFFER_H
#define DSHAL_BUFFER_H

#include <Python.h>

/* A C-contiguous buffer of `ndim` dimensions and `itemsize`-byte items (writable if asked),
 * named `name` in the error. 0 on success, -1 with the error set (nothing held). */
static int get_buffer(PyObject *obj, Py_buffer *view, int ndim, Py_ssize_t itemsize,
                      int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT |
                           (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->ndim != ndim || view->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous %d-D array of %zd-byte items",
                     name, ndim, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#endif
