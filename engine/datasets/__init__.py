"""Footage and images in: readers of MVTec, Ped2 and ShanghaiTech layouts and folders
(readers.py), video files in and out (video.py), and generated synthetic scenes in the Ped2
layout (synthetic.py)."""
from .readers import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    Clip,
    ImageSample,
    MvtecCategory,
    TestClip,
    VideoDataset,
    VideoLayout,
    detect_video_layout,
    find_mvtec_categories,
    iter_source_frames,
    list_source_files,
    natural_key,
    read_image,
)
from .video import DecodeStats, count_video_frames, iter_video_frames, write_video

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "Clip", "DecodeStats", "ImageSample", "MvtecCategory", "TestClip",
           "VideoDataset", "VideoLayout", "count_video_frames", "detect_video_layout", "find_mvtec_categories",
           "iter_source_frames", "iter_video_frames", "list_source_files", "natural_key", "read_image", "write_video"]
